"""msff.data"""
