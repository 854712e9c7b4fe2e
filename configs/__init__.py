"""ml_collections config files; `common.get_config` holds the defaults the others start from."""
