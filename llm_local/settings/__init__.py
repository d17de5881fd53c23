"""Layered settings (dynaconf) validated into typed, frozen objects."""
