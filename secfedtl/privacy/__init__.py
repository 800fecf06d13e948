"""secfedtl.privacy"""
