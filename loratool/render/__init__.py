"""Terminal output. The only package that imports rich; the library below never prints."""
