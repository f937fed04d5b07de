"""Procedure logic shared by the procedure node and the simulated procedure (no rclpy)."""
