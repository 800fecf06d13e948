"""secfedtl.secagg"""
