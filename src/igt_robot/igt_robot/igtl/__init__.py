"""OpenIGTLink bridge to 3D Slicer (pyigtl based, no rclpy).

RAS millimetres on the wire, scanner LPS metres everywhere else; see
docs/igtl_protocol.md for message names, directions and replies.
"""
from .bridge import BRP_COMMANDS, BridgeConfig, BridgeConfigError, BridgeCore, ImageData
from .messages import StatusCode, StatusMessage, register_status_message
from .server import FramingError, IgtlServer, StreamReader

__all__ = ['BRP_COMMANDS', 'BridgeConfig', 'BridgeConfigError', 'BridgeCore', 'ImageData', 'StatusCode',
           'StatusMessage', 'register_status_message', 'FramingError', 'IgtlServer', 'StreamReader']
