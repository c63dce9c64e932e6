import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 30_000,
    // The stack tests share one gateway; each uses its own users, so files may run at once.
    fileParallelism: true,
  },
});
