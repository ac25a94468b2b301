"""Slicer glue for the DeepSeg module (may import slicer, vtk, qt); contains no ML maths."""
