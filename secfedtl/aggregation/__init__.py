"""secfedtl.aggregation"""
