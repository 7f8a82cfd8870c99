#include <gtest/gtest.h>

#include "../../../src/driver/mount_options.hpp"

using layerd::driver::build_mount_options;
using layerd::driver::MountSpec;

TEST(MountOptions, ReadWriteLayerUsesRelativePathsUnderTheHome) {
  MountSpec spec{"ctr", {"l/AAAAAAAAAAAAAAAAAAAAAAAAAA", "l/BBBBBBBBBBBBBBBBBBBBBBBBBB"}, false, ""};
  EXPECT_EQ(build_mount_options(spec),
            "lowerdir=l/AAAAAAAAAAAAAAAAAAAAAAAAAA:l/BBBBBBBBBBBBBBBBBBBBBBBBBB,"
            "upperdir=ctr/diff,workdir=ctr/work");
}

TEST(MountOptions, CommittedLayerMountsItsDiffAsTheTopLowerWithoutUpper) {
  MountSpec spec{"img", {"l/AAAAAAAAAAAAAAAAAAAAAAAAAA"}, true, ""};
  EXPECT_EQ(build_mount_options(spec), "lowerdir=img/diff:l/AAAAAAAAAAAAAAAAAAAAAAAAAA");
}

TEST(MountOptions, MountLabelBecomesAContextOption) {
  MountSpec spec{"c", {"l/X"}, false, "system_u:object_r:container_file_t:s0:c1,c2"};
  EXPECT_EQ(build_mount_options(spec),
            "lowerdir=l/X,upperdir=c/diff,workdir=c/work,"
            "context=\"system_u:object_r:container_file_t:s0:c1,c2\"");
}

TEST(MountOptions, OneHundredTwentyEightLowersFitInOnePage) {
  MountSpec spec;
  spec.id = std::string(64, 'f');
  for (int i = 0; i < 128; ++i) spec.lowers.push_back("l/" + std::string(26, 'A'));
  EXPECT_LT(build_mount_options(spec).size(), 4096u);
}
