INSERT INTO events_plain (tenant, event) VALUES ('acme', 'login');
