"""Backends that change the pool sizes; the interface is ``base.Actuator``."""
