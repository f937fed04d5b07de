"""Thin rclpy adapters around the functional core. Nothing here computes what a core module could."""
