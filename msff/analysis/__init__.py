"""Analyses of the paper's claims: effective receptive field (:mod:`msff.analysis.erf`) and the
soil-like proxy for confusable false positives (:mod:`msff.analysis.confusable`)."""
