"""Analyses from papers related to Geva et al. (2021), one module per paper."""
