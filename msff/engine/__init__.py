"""msff.engine"""
