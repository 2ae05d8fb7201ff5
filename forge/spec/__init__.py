"""The experiment spec: schema (pydantic), loading (extends, --set), hashing and diffs."""
