"""Checks on a draft report, torch-free: the Spanish findings labeler, the evidence guard
(the report's findings and sides against the frontend's own image evidence) and the anatomy
gate (the U-Net's maps against the ranges seen on training images).
"""
