"""edge: a resource-governed Modbus edge appliance (poll -> store -> uplink)."""

__version__ = "0.1.0"
