"""legorun: the LegoOS split-kernel in user space."""
__version__ = "0.1.0"
