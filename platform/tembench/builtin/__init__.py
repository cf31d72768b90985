"""Generic components that ship with tembench, registered through the same hooks as any plugin.

Every module in this package is registered automatically (see registry.builtin_modules).
"""
