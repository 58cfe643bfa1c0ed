"""MQTT 3.1.1 for the DPS device API: a sans-IO codec (`codec`) and the DPS names (`topics`)."""
