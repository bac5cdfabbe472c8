"""Downstream evaluation of MARLIN features: linear probing and fine-tuning."""
