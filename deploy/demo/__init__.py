"""`make demo`: seed a running platform with lifecycle journeys and stream simulated customers."""
