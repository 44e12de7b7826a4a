"""Parity suite: the float64 oracle, the autodiff reference and the cross-framework tests."""
