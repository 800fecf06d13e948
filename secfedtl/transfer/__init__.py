"""secfedtl.transfer"""
