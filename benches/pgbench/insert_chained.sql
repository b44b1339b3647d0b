INSERT INTO events_chained (tenant, event) VALUES ('acme', 'login');
