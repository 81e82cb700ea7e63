"""The top floor: the demo pipeline, its report and the generated settings table; the only package that knows every service."""
