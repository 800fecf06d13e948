"""secfedtl.encoding"""
