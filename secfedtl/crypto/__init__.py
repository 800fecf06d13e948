"""secfedtl.crypto"""
