"""secfedtl.runtime"""
