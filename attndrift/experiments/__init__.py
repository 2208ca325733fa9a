"""Experiments: ``results`` (typed sweep lines and their files), ``sweep`` (the resumable run
loop), ``summary`` (tables, paired tests, selection rules), ``demo`` and its HTML ``report``.
"""
