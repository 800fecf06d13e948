"""secfedtl.testing"""
