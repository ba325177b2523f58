-- The postgres image creates POSTGRES_DB (mlmesh); MLflow's backend store needs its own.
CREATE DATABASE mlflow;
