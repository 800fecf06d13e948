"""secfedtl.training"""
