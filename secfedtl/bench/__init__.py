"""secfedtl.bench"""
