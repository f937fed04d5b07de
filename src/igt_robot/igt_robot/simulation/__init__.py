"""Simulation of the patient, the scanner and the robot's mounting (ground truth for the simulated procedure)."""
