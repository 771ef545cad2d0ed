"""Export trained runs to other inference engines (`detr export`), and decode through them
(`detr translate --engine`). Each engine's module uses that engine's own API; this subpackage
uses detr's public API and predictors only."""
