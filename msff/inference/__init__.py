"""msff.inference"""
