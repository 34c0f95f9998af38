"""Results: metrics with patient-bootstrap intervals, calibration, operating points, baselines, expert
labels, the published numbers, and the tables and plots people read."""
