"""What turnstore knows about Agents SDK objects: items, run usage, wrapper hooks."""
