"""The ``qkv`` command line."""
