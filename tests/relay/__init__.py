"""Tests of the outbound relay building blocks."""
