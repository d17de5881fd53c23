"""backends/fake"""
