"""secfedtl.data"""
