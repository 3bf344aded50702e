"""Thin typer/rich command-line front end: parse, call the libraries, render."""
