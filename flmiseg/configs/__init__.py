"""Config files: each defines `get_config()` returning an ml_collections.ConfigDict.
default.py holds every field with a comment on each; the others change only what differs.
Imports nothing of flmiseg's but other configs.
"""
