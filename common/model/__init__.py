"""Model shape contracts shared by every service: config.json parsing and the embedded presets."""
