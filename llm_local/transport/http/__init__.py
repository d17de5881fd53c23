"""transport/http"""
