"""Cleaner: delete archived, verified detail rows and move their counts to lifetime totals."""
