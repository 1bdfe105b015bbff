"""Recipe config: the schema and loading of recipes, and the DeepSpeed config built from them."""
