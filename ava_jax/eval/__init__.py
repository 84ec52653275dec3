"""Evaluation: reward-model accuracy, margins and the calibration of AVA's uncertainty."""
