"""backends/ct2"""
