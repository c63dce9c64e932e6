export * from "./client.js";
export * from "./batcher.js";
export * from "./errors.js";
export * from "./retry.js";
export type { components, paths } from "./generated/schema.js";
